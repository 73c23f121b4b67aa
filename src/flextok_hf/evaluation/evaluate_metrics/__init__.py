"""`evaluate` metric modules, loaded offline with `flextok_hf.evaluation.load_metric(name)` or
`evaluate.load(<path of the module's .py file>)`. Each is a thin wrapper over `flextok_hf.evaluation.metrics`."""
