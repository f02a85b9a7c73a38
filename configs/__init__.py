"""ml_collections configuration files; pass one with --config=configs/<name>.py."""
