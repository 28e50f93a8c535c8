"""Dynamic scaling: signals from the router and supervisor, a decider that applies the policy to them, an actuator
that carries its decisions out, and the scaler that runs the two in the daemon."""
