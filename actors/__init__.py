"""Ray actors that host the specserve core: draft workers, tensor-parallel target workers, router."""
