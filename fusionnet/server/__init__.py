"""`fusionnet serve`: an HTTP server and web page around one model (`main`, `http`, `requests`,
`service`). Nothing else in the library imports this."""
