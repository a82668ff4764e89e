"""Setting a node up: its key file, its config file and the grid's genesis file."""
