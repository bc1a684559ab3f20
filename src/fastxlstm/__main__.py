from fastxlstm.cli import main

raise SystemExit(main())
