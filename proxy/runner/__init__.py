"""Runs the proxy: a supervisor process (config, reloads, admin) and N Trio worker processes."""
