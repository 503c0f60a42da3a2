"""Moving events in and out: export, import, prune."""
