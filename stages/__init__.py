"""The pipeline's stages: each a module with load config -> set up -> run -> save."""
