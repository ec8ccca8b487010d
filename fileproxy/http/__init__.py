"""Wire details shared by the server and upstream sides: header rewriting, error answers, client bodies."""
