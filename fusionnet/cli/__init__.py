"""The `fusionnet` command (`main`): matte, export, serve, pull. Nothing else in the library imports this."""
