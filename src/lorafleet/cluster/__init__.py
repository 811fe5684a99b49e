"""Scale-out on Ray Serve: engine replicas behind one ingress, adapter-aware routing, one shared registry.

``ray_app`` (the deployments; imports ``ray``), ``remote`` (the ingress's engine proxy), ``fleet`` (the
residency/metrics view across replicas), ``config`` (``ClusterConfig``), ``launch`` (``lorafleet serve
--cluster ray``). Install with ``pip install 'lorafleet[ray]'``.
"""
