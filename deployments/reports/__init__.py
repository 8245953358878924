"""What people read: history, compare, charts and comments, as read models and their rendering."""
