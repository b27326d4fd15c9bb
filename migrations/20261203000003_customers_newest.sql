-- `GET /customers` pages newest first by (created_at, id), resuming after
-- the last row of the previous page: this index serves each page as one
-- short range scan, however deep the page.
CREATE INDEX customers_newest ON customers.customers (created_at DESC, id DESC);
