"""Example tasks on real data that every machine has offline."""
