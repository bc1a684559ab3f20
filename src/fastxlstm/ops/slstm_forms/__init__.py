"""sLSTM forms: reference (the definition) and a vectorised recurrent one."""
