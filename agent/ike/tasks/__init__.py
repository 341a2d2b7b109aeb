"""The exchanges of an IKE_SA as tasks (strongSwan libcharon's split), one module each.

Each task holds the state of its own exchange (nonces, KE, SPIs) and has build/process for
request and response; agent.ike.sa.IkeSa owns message IDs, the window, retransmission, SK
seal/open and dispatches requests to the task of their exchange type. Tasks do no I/O and
never import agent.ike.sa (they reach their IkeSa through ``self.sa``).

- ike_init: IKE_SA_INIT (RFC 7296 §1.2), NAT detection (agent.ike.natt), COOKIE, INVALID_KE
- ike_intermediate: IKE_INTERMEDIATE (RFC 9242) for additional key exchanges (RFC 9370)
- ike_auth: IKE_AUTH (§1.2, §2.15) with the first CHILD_SA and CP (§3.15)
- child_create: CREATE_CHILD_SA for a new CHILD_SA or a CHILD_SA rekey (§1.3.1, §1.3.3)
- ike_rekey: CREATE_CHILD_SA for the IKE_SA rekey (§1.3.2)
- followup_ke: IKE_FOLLOWUP_KE (RFC 9370 §2.2.4)
- informational: INFORMATIONAL deletes and liveness checks (§1.4, §2.4)
"""
