"""Features built on the request path: async tasks and resumable uploads, handed what they need."""
