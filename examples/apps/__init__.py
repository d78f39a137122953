"""The classic mesh example as three tiny HTTP services: customer -> preference -> recommendation.

Each app is a plain HTTP server that calls its downstream by name (`http://preference:8080/`). It knows
nothing of the mesh: on loopback the standard `http_proxy` variable sends those calls to the proxy's
egress listener; inside a network namespace, iptables capture does the same without any variable.
"""
