"""Ray Serve applications (import paths for `serve deploy` configs)."""
