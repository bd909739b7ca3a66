"""Tables, engine setup and migrations of TokenTrail's database (SQLite by default)."""
