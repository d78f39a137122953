"""Load balancing: endpoint picks and upstream connection pools."""
