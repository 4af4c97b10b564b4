"""Ray Serve application: builder, OpenAI-compatible API, config."""
