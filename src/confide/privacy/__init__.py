"""Privacy layers: what keeps a site's data and its own update from the server and the other sites."""
