"""Code generation from the one message catalogue, tools/schema/messages.toml."""
