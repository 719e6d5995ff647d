"""planner: validates ClusterSets and turns desired membership into cluster requests and retirements."""
