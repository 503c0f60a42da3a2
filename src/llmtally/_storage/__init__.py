"""The ledger database: tables, migrations, the store, the background writer and its spill file."""
