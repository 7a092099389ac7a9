"""Hook specifications, the plugin manager, and the sandbox that runs user scripts."""
