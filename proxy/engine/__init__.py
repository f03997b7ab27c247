"""The attempt loop: trying a plan's instances until one answers, relaying the answer,
continuing a cut stream elsewhere."""
