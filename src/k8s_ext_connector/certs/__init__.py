"""Key material: SSH identities now; the CA and webhook certificates come with the webhook."""
