"""The routing decision's pure pieces, below the profile: what the router knows of each instance (pool), where
a prompt's prefix is likely cached (prefix), the strategies that choose an instance (pieces) and the policies
that choose a request's phase (phase), registered by name so that a profile is checked against the same
registries the router builds from."""
