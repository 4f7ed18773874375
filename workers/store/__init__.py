"""Postgres: the schema, its migrations, and one repository module per aggregate. All SQL lives
here; :mod:`workers.store.db` is where psycopg and SQLAlchemy errors become Nudge's own."""
