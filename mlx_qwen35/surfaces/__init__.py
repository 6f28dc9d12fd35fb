"""What users touch: the command line, the chat REPL, the demo, the HTTP server, the menu-bar app."""
