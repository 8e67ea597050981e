"""Many replicas, one cache (`[coordination]`): who this replica is, how replicas trust each other."""
