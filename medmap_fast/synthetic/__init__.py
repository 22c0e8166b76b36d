"""The demo's synthetic studies: MNI152-based brains and an abdominal phantom, rendered into MRI contrasts with
lesions and reports."""
