"""`pdctl simulate`: a whole PD cluster in virtual time, with the daemon's routing code and the engine model.

The seam to `pdctl bench` is two small shapes: a workload is a list of `workload.SimRequest` (arrival_s,
input_tokens, output_tokens, prefix group), and results are `report.RequestRecord`s (ttft, itls, e2e) that
`report.summarize` turns into vllm bench serve's metrics. Any generator of the first and any reporter of the
second can replace pdctl's own."""
