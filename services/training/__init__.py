"""Training service: fine-tuning runs launched as trainer jobs (local process or Kubernetes Job)."""
