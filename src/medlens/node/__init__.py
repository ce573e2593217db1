"""The DICOM node (`medlens serve`, `medlens batch --from-pacs`): a Storage SCP that explains idle studies through
the batch runner and sends the results back by C-STORE, with a crash-safe ledger; and pulling studies from a PACS.
"""
from medlens.node.ledger import Ledger, StudyState
from medlens.node.receiver import Limits, NodeError, Receiver
from medlens.node.sender import Peer, store
from medlens.node.service import Node, NodeConfig

__all__ = ["Ledger", "Limits", "Node", "NodeConfig", "NodeError", "Peer", "Receiver", "StudyState", "store"]
