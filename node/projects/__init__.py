"""Projects: the unit of a learning loop (task labels, cases, annotators, states, label versions)."""
