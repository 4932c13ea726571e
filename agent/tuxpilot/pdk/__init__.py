"""The plugin development kit and the marketplace: scaffolding, development and testing of a plugin, and
its package (build, sign, verify, unpack), dependency check and registries."""
