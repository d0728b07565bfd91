"""The cluster path: submitting jobs to a Ray cluster and rendering KubeRay manifests from experiment configs."""
