"""Kubernetes: kernels as pods, pipeline steps as Jobs, schedules as CronJobs (see docs/kubernetes.md)."""
