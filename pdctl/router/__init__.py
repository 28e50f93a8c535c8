"""The routing daemon: an OpenAI-compatible proxy that sends each request through prefill then decode, or
straight to a decode or hybrid instance, by the profile's policy."""
