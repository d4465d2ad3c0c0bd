"""Host-independent implementations of the pack's methods (torch only; never imports ComfyUI)."""
