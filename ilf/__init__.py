"""ilf: Imitation learning from Language Feedback for code models.

The shared core every service, the trainer and the command line use: configuration,
artifact store, model registry, model loading and sampling, prompts, data and pass@k.
"""
