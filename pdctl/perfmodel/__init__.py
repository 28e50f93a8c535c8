"""pdctl's performance model of a vLLM engine: model architectures and measured hardware profiles (data
files), step time from a batch's shape, and a vLLM-v1-like scheduler in virtual time. The `sim` engine and
`pdctl simulate` both run on it."""
