"""The cluster tier: many engine replicas behind one OpenAI endpoint (router, autoscaler, Ray Serve)."""
