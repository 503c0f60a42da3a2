"""A call as a value: the CallEvent, its usage and token counting, attribution scopes, ids,
metadata cleaning."""
