"""Dynamic scaling: signals from the router and supervisor, a policy that decides, an actuator that acts."""
