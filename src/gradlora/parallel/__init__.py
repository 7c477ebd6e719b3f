"""Every line that knows about ranks, process groups, DTensors or DeepSpeed partitions."""
