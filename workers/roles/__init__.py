"""One module per worker role: a handler that decodes its queue's messages and says what
happened to each; the runtime's consumer loop drives it. Roles never import one another."""
