"""What each instance is and whether it is up: the instance registry (the one writer of
runtime state), background probes, circuit breakers, fingerprints."""
