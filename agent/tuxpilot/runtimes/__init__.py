"""The plugin host: how each manifest runtime is started, confined and supervised."""
