"""Model configuration: the supported architectures and how to build their module trees."""
