"""Command line: ``fastxlstm train | generate | eval`` (placeholder until the training issue lands)."""
import sys


def main(argv=None) -> int:
    print("fastxlstm: the train / generate / eval commands are coming soon (see the issues).", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
